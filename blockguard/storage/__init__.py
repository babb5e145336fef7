"""Everything that touches a block device or runs dmsetup, lvm or the thin/era tools."""
