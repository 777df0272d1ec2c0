//! End-to-end suite: real nix, real images, real systemd hosts.
