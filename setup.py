"""Build hooks (everything else is in pyproject.toml): the containerd API stubs (and fractal's own
``fractal.layers.v1``, hack/protos/fractal/) are made while the wheel is built, from pinned .proto
sources, and never committed (docs/install.md).

* ``build_py``: after the packages are copied, ``hack/gen_protos.py`` generates
  ``ccpu/api/gen`` into the build dir, so the wheel carries stubs that match its own
  grpcio-tools/protobuf pins whatever the source tree holds.  Editable installs skip it: the
  dev tree's stubs come from ``hack/setup.sh`` running the generator in place.
* ``sdist``: the pinned .proto files go into the sdist under ``proto-src/``, so a wheel built
  from the sdist needs no network (``hack/protosrc.py`` looks there first).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class build_py(_build_py):
    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        if not editable:
            # pip builds in the tree: a module deleted or moved since the last build (say
            # ccpu/cli.py -> ccpu/cli/) would otherwise linger in build/lib and in the wheel.
            shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()
        if editable:
            return
        from hack import gen_protos

        try:
            gen_protos.generate(force=True, quiet=False, out_root=Path(self.build_lib))
        except gen_protos.GenError as exc:
            raise SystemExit(f"fractal: cannot generate the API stubs: {exc}") from None


class sdist(_sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        from hack import protosrc

        for (module, rel), data in protosrc.resolve(HERE).items():
            dst = Path(base_dir) / protosrc.SDIST_DIR / module / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)


setup(cmdclass={"build_py": build_py, "sdist": sdist})
