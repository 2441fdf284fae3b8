"""Run open_clip's own trainer (open_clip_train) with psdclip's model configs registered.

One compatibility fix is applied, the one its users apply (webdataset #384, open_clip #935): webdataset >= 0.2.96
ends each shard with an empty end-of-file sample (`eof_value={}`) that open_clip_train's `group_by_keys_nothrow`
cannot read (KeyError 'fname' when a loader worker reaches the end of a shard); its tar expansion is called with
`eof_value=None`, as before that release. Nothing else of open_clip_train changes."""
import sys

from psdclip.train import models  # noqa: F401  (registers psdclip-tiny with open_clip)


def _without_eof_marker():
    import inspect

    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander, url_opener

    if "eof_value" not in inspect.signature(tar_file_expander).parameters:
        return  # an older webdataset: nothing to fix

    def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return data.group_by_keys_nothrow(files, handler=handler)

    data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow  # read by name where the pipeline is made


if __name__ == "__main__":
    _without_eof_marker()
    from open_clip_train.main import main

    main(sys.argv[1:])
