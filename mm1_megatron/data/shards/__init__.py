"""On-disk data: tar shards and manifests, records, the writer, ingest of public layouts,
indexed text, bad-sample accounting."""
