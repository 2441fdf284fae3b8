"""The statuses a row of a dataset can have: one name each, used by every stage (as webdataset keeps its error
policy in one handlers module). A row starts PENDING; the per-partition stages may mark it (invalid_url,
empty_caption, ...), the global ones DUPLICATE_URL, the download SUCCESS or a failure kind, the image dedupe
DUPLICATE_IMAGE. Only SUCCESS rows are training samples."""

PENDING = "pending"
SUCCESS = "success"
DUPLICATE_URL = "duplicate_url"
DUPLICATE_IMAGE = "duplicate_image"  # downloaded, its bytes kept in the shard, but the same image as another row
# what `--retry-failed` tries again (robots_unreachable: a site whose robots.txt could not be read, RFC 9309)
TRANSIENT = ("timeout", "http_5xx", "rate_limited", "connection_error", "robots_unreachable")
