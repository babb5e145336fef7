"""A backup target on another host, reached over SSH (issue 11; docs/design/remote.md)."""
