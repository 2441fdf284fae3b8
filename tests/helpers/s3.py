"""A real S3-compatible server on loopback (moto's server mode) for the tests of object-store paths."""
import contextlib
import os


@contextlib.contextmanager
def moto_s3(monkeypatch):
    """Start moto's server on 127.0.0.1 and point the AWS variables of this process at it; yields the variables
    (to hand to Dask workers as well)."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    S3FileSystem.clear_instance_cache()  # file systems made for an earlier test's server (another port)
    try:
        yield {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                          "AWS_ENDPOINT_URL")}
    finally:
        S3FileSystem.clear_instance_cache()
        srv.stop()
