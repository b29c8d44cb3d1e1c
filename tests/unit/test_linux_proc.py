import os

from ccpu.linux import proc


def test_parse_stat_takes_fields_after_the_last_paren():
    raw = "42 (a) b) (c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10"
    st = proc.parse_stat(42, raw)
    assert st is not None
    assert (st.state, st.ppid, st.start_time) == ("S", 7, 987654)


def test_parse_stat_rejects_truncated_lines():
    assert proc.parse_stat(1, "1 (init") is None
    assert proc.parse_stat(1, "1 (init) S 0 1") is None


def test_zombie_has_no_start_time_but_a_stat():
    st = proc.parse_stat(5, "5 (x) Z 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0")
    assert st is not None and not st.alive


def test_own_process_is_alive_and_stable():
    me = proc.start_time(os.getpid())
    assert me is not None and me == proc.start_time(os.getpid())
    assert proc.stat(os.getpid()).ppid == os.getppid()


def test_missing_pid_gives_none():
    assert proc.start_time(2**22 + 12345) is None
