"""Shared helpers for tests that build datasets."""
import os
import tarfile

from psdclip.pipeline.config import BuildConfig


def cfg(inputs, out, **kw):
    base = dict(inputs=[str(p) for p in inputs], out=str(out), image_size=32, shard_size=80, processes_count=2,
                thread_count=8, timeout=2.0, progress=False)
    base.update(kw)
    return BuildConfig(**base)


def tar_members(ds):
    """key -> {suffix: bytes} over every shard, failing on a key present twice."""
    out = {}
    for name in sorted(os.listdir(ds / "shards")):
        with tarfile.open(ds / "shards" / name) as tf:
            for m in tf:
                key, _, suffix = m.name.partition(".")
                entry = out.setdefault(key, {"shard": name})
                assert suffix not in entry, f"{key}.{suffix} twice"
                entry[suffix] = tf.extractfile(m).read()
    return out
