"""shim/layerview.py's pure parts: which name a layer dir has in the view, what must be bound."""

from __future__ import annotations

import pytest

from shim.layerview import LayerViewError, layer_name, needed


def test_a_layer_dir_is_named_by_its_id_below_the_repos_layers() -> None:
    assert layer_name("/r/layers/12", "/r/layers") == "12"
    assert layer_name("/r/layers/12/fs/", "/r/layers/") == "12"
    assert layer_name("/r/layers/./12", "/r/layers") == "12"


@pytest.mark.parametrize("path", ["/r/layers", "/r/layers/..", "/r/layers/../active/3", "/r/other/1",
                                  "r/layers/1", "/r/layers/.hidden", "/r/layersx/1"])
def test_anything_else_is_refused(path: str) -> None:
    with pytest.raises(LayerViewError):
        layer_name(path, "/r/layers")


def test_a_layer_stays_bound_while_any_owner_uses_it() -> None:
    assert needed({}) == set()
    assert needed({"a": frozenset({"1", "2"}), "b": frozenset({"2", "3"})}) == {"1", "2", "3"}
