// Package conformance runs containerd's own snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against the fractal
// proxy snapshotter, through containerd's own proxy client.
//
// Each subtest starts its own `python3 -m snapshotter.server` on a fresh repo
// under the test's temporary root; no containerd daemon is involved.  The
// suite mounts the returned mounts itself, so it needs root.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// fractalSrc is the project checkout the snapshotter runs from.
func fractalSrc() (string, error) {
	src := os.Getenv("FRACTAL_SRC")
	if src == "" {
		src = filepath.Join("..", "..")
	}
	return filepath.Abs(src)
}

func waitForSocket(path string, proc *exec.Cmd, exited <-chan error, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("snapshotter exited before serving %s: %v", path, err)
		default:
		}
		if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("snapshotter did not serve %s within %s", path, timeout)
}

// newSnapshotter is the testsuite.SnapshotterFunc for fractal.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	src, err := fractalSrc()
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(root, "s.sock")
	sockDir := ""
	if len(sock) > 100 { // unix socket paths are limited to 108 bytes
		if sockDir, err = os.MkdirTemp("/tmp", "fractal-sock-"); err != nil {
			return nil, nil, err
		}
		sock = filepath.Join(sockDir, "s.sock")
	}
	logPath := filepath.Join(filepath.Dir(root), "snapshotter.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	args := []string{"-m", "snapshotter.server", "--root", filepath.Join(root, "repo"), "--address", sock}
	if os.Getenv("FRACTAL_DEBUG") != "" {
		args = append(args, "--debug")
	}
	cmd := exec.Command("python3", args...)
	cmd.Dir = src
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), "PYTHONPATH="+src)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); close(exited) }()

	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logFile.Close()
		if sockDir != "" {
			os.RemoveAll(sockDir)
		}
		if os.Getenv("FRACTAL_CONFORMANCE_LOGS") != "" {
			if b, err := os.ReadFile(logPath); err == nil {
				fmt.Fprintf(os.Stderr, "--- snapshotter log %s ---\n%s\n", root, b)
			}
		}
		return nil
	}
	if err := waitForSocket(sock, cmd, exited, 30*time.Second); err != nil {
		stop()
		b, _ := os.ReadFile(logPath)
		return nil, nil, fmt.Errorf("%w\n%s", err, b)
	}
	conn, err := grpc.Dial("unix://"+sock,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithTimeout(10*time.Second), //nolint:staticcheck
	)
	if err != nil {
		stop()
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "fractal")
	cleanup := func() error {
		cerr := conn.Close()
		serr := stop()
		if cerr != nil {
			return cerr
		}
		return serr
	}
	return sn, cleanup, nil
}

func TestSnapshotterSuite(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the snapshotter testsuite mounts snapshots: needs root")
	}
	testsuite.SnapshotterSuite(t, "fractal", newSnapshotter)
}
