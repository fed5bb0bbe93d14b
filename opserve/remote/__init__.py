"""Model repositories in object storage (s3://, gs://, as://), served from a local mirror.

`repositories.open_repository(url)` parses the URL, applies Triton's credential rules and
returns the `mirror.RepositoryMirror` whose `folder` the rest of opserve reads like any local
repository; `repositories.localize` does so for the repositories a command names. The other
modules: `locations` (Triton's URL forms), `credentials` (Triton's credential rules).

This file imports none of them: the command line reads `locations` before `opserve serve` hands
a preloaded library over to its workers, and nothing heavier may load by then (hashlib's
OpenSSL crashes the process beside a preloaded TensorFlow).
"""
