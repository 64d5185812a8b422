"""Support for the image and bare-box tests: a Debian root filesystem made with mmdebstrap (no image
registry) and a podman whose storage is cached under the repository's build dir (`.build/image/`).

See docs/deploy.md ("The image") and tests/image/.
"""
