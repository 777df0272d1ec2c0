# The busybox seed everything in this stub is built from, pinned by content.
# ../prepare-seed (run by scripts/setup) puts Debian's static busybox there as
# bin/busybox + bin/sh -> busybox. The hash depends only on busybox's bytes:
# it is the same on every machine with busybox-static 1:1.35.0-4+deb12u1+b1.
# Pure evaluation may read it because it is pinned (builtins.fetchTree).
{
  type = "path";
  path = "/usr/local/lib/attache-seed";
  narHash = "sha256-HQSV/PgXO9v7Qj5uQt71RduDHcAQxi0aEJPTEw2BpFQ=";
}
