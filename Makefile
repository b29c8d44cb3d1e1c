# Thin wrappers so the usual entry points are discoverable; the logic lives in hack/.
# `make run` and `make test` are the README's two commands: both install what is
# missing first (hack/setup.sh is idempotent and takes ~0.5 s when nothing changed).
# .venv: hack/setup.sh's dev install when python3 is externally managed (stock Debian/Ubuntu)
PYTHON ?= $(if $(wildcard .venv/bin/python3),.venv/bin/python3,python3)
PYTEST_ARGS ?=

.PHONY: run test setup setup-run setup-debian protos images bench
run: setup-run  ## set up, then run the main job: containers through containerd on the fractal repo
	$(PYTHON) hack/demo.py
test: setup     ## set up, then run the whole test suite (unit + integration through a private containerd)
	$(PYTHON) -m pytest $(PYTEST_ARGS)
setup:          ## apt packages, pip -e .[build,images,test,bench], protobuf stubs, test images
	bash hack/setup.sh
setup-run:      ## what `make run` needs: as setup, but of the Go peers only crictl (the others are test-only)
	bash hack/setup.sh --run
setup-debian:   ## same, plus the slow debian test image
	bash hack/setup.sh --with-debian
protos:         ## (re)generate ccpu/api/gen if the containerd protos changed
	$(PYTHON) hack/gen_protos.py
images:         ## build busybox/edge/tools test images into $FRACTAL_CACHE/images
	$(PYTHON) hack/testimages.py build
bench: setup-debian  ## snapshotter benchmark against containerd's overlayfs (figures in docs/performance.md)
	$(PYTHON) hack/bench/snapshotter.py
