"""The ``fractal.layers.v1`` messages (hack/protos/fractal/layers/v1/layers.proto) <-> the plain
values both ends work with.  One module, so the shim (shim/layers.py) and the CLI
(ccpu/cli/layers.py) cannot disagree on a field: they used to exchange JSON in a StringValue,
each end spelling the keys on its own.

The dicts have the shapes docs/live-layers.md describes (absent optional fields are None, never
the proto3 default: a size of 0 and an unknown size differ).  The service name and position
rules are ccpu/layersapi.py's.
"""

from __future__ import annotations

from typing import Any

from ccpu.api.gen.fractal.layers.v1 import layers_pb2 as pb

#: the request message of each method; every method answers a :class:`pb.Stack`
REQUESTS: dict[str, type[Any]] = {"List": pb.ListRequest, "Add": pb.AddRequest,
                                  "Remove": pb.RemoveRequest, "AddImages": pb.AddImagesRequest,
                                  "RemoveTargets": pb.RemoveTargetsRequest}
Stack = pb.Stack


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


# -- requests -----------------------------------------------------------------------------------


def request(method: str, payload: dict[str, Any]) -> Any:
    """The request message of ``method`` for the CLI's payload."""
    if method == "List":
        return pb.ListRequest(container=payload.get("container") or "")
    if method == "Add":
        position = payload.get("position")
        given = [la if isinstance(la, dict) else {"dir": la} for la in payload.get("layers") or []]
        layers = [pb.NewLayer(dir=la["dir"], chain_id=la.get("chain_id") or "",
                              image=la.get("image") or "", gc_label=la.get("gc_label") or "",
                              **({"size": la["size"]} if la.get("size") is not None else {}))
                  for la in given]
        return pb.AddRequest(container=payload.get("container") or "", layers=layers,
                             position="" if position is None else str(position))
    if method == "AddImages":
        position = payload.get("position")
        return pb.AddImagesRequest(container=payload.get("container") or "", images=payload.get("images") or [],
                                   position="" if position is None else str(position))
    if method == "Remove":
        return pb.RemoveRequest(container=payload.get("container") or "", layers=payload.get("layers") or [],
                                images=payload.get("images") or [])
    if method == "RemoveTargets":
        return pb.RemoveTargetsRequest(container=payload.get("container") or "",
                                       targets=payload.get("targets") or [])
    raise ValueError(f"no such method {method!r}")


def request_args(req: Any) -> dict[str, Any]:
    """A request message as the shim's handlers read it."""
    out: dict[str, Any] = {"container": req.container}
    if isinstance(req, pb.AddRequest):
        out["layers"] = [{"dir": la.dir, "chain_id": la.chain_id, "image": la.image,
                          "size": _opt(la, "size"), "gc_label": la.gc_label} for la in req.layers]
        out["position"] = req.position or None
    elif isinstance(req, pb.AddImagesRequest):
        out["images"] = list(req.images)
        out["position"] = req.position or None
    elif isinstance(req, pb.RemoveRequest):
        out["layers"] = list(req.layers)
        out["images"] = list(req.images)
    elif isinstance(req, pb.RemoveTargetsRequest):
        out["targets"] = list(req.targets)
    return out


# -- the answer ---------------------------------------------------------------------------------

_LAYER_STR = ("dir", "chain_id", "image", "gc_label")


def _layer(entry: dict[str, Any]) -> Any:
    msg = pb.Layer(live=bool(entry.get("live")),
                   **{k: str(entry.get(k) or "") for k in _LAYER_STR})
    for k in ("size", "added_at"):
        if isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool):
            setattr(msg, k, entry[k])
    return msg


def _layer_dict(msg: Any) -> dict[str, Any]:
    return {"dir": msg.dir, "live": msg.live, "chain_id": msg.chain_id, "image": msg.image,
            "size": _opt(msg, "size"), "gc_label": msg.gc_label, "added_at": _opt(msg, "added_at")}


def answer(view: dict[str, Any]) -> Any:
    """The shim's answer (its stack view plus what the call changed) as a :class:`pb.Stack`."""
    msg = pb.Stack(container=view.get("container") or "",
                   layers=[_layer(e) for e in view.get("layers") or []],
                   history=[pb.Change(at=int(h.get("at") or 0), added=h.get("added") or [],
                                      removed=h.get("removed") or [],
                                      restack_ms=float(h.get("restack_ms") or 0.0))
                            for h in view.get("history") or [] if isinstance(h, dict)],
                   added=view.get("added") or [], skipped=view.get("skipped") or [],
                   removed=[_layer(e) for e in view.get("removed") or []],
                   missing={str(k): str(v) for k, v in (view.get("missing") or {}).items()},
                   snapshotter=view.get("snapshotter") or "",
                   labels_removed=view.get("labels_removed") or [])
    for k in ("repo_root", "upper"):
        if view.get(k) is not None:
            setattr(msg, k, view[k])
    if view.get("restack_ms") is not None:
        msg.restack_ms = float(view["restack_ms"])
    return msg


def answer_dict(msg: Any) -> dict[str, Any]:
    """A :class:`pb.Stack` as the CLI reads it (only the fields the method fills)."""
    out: dict[str, Any] = {
        "container": msg.container, "repo_root": _opt(msg, "repo_root"), "upper": _opt(msg, "upper"),
        "layers": [_layer_dict(e) for e in msg.layers],
        "history": [{"at": h.at, "added": list(h.added), "removed": list(h.removed),
                     "restack_ms": h.restack_ms} for h in msg.history],
    }
    if msg.missing:
        out["missing"] = dict(msg.missing)
        out["snapshotter"] = msg.snapshotter
    if msg.HasField("restack_ms"):
        out["restack_ms"] = msg.restack_ms
        out.update(added=list(msg.added), skipped=list(msg.skipped),
                   removed=[_layer_dict(e) for e in msg.removed])
    if msg.labels_removed:
        out["labels_removed"] = list(msg.labels_removed)
    return out
