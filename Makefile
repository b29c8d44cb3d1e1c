# Thin wrappers so the usual entry points are discoverable; the logic lives in hack/.
PYTHON ?= python3

.PHONY: setup setup-debian protos images
setup:          ## apt packages, pip -e .[build,images,test], protobuf stubs, test images
	bash hack/setup.sh
setup-debian:   ## same, plus the slow debian test image
	bash hack/setup.sh --with-debian
protos:         ## (re)generate ccpu/api/gen if the containerd protos changed
	$(PYTHON) hack/gen_protos.py
images:         ## build busybox/edge/tools test images into $FRACTAL_CACHE/images
	$(PYTHON) hack/testimages.py build
