"""The statuses a row of a dataset can have: one name each, used by every stage (as webdataset keeps its error
policy in one handlers module). A row starts PENDING; the per-partition stages may mark it (invalid_url,
empty_caption, ...), the global ones DUPLICATE_URL, the download SUCCESS or a failure kind, the image dedupe
DUPLICATE_IMAGE. Only SUCCESS rows are training samples."""

PENDING = "pending"
SUCCESS = "success"
DUPLICATE_URL = "duplicate_url"
DUPLICATE_IMAGE = "duplicate_image"  # downloaded, its bytes kept in the shard, but the same image as another row
TRANSIENT = ("timeout", "http_5xx", "rate_limited", "connection_error")  # what `--retry-failed` tries again
