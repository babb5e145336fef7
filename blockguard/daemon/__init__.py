"""blockguardd: D-Bus objects, scheduler loop, udev watcher, systemd notification."""
