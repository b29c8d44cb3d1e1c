"""`fractal boot`: an OCI image (or a `docker export` tgz) booted as a whole machine (docs/boot.md)."""
