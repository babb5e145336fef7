"""blockguardctl: the command-line client of blockguardd."""
