"""Finding the relay on the LAN (mDNS/DNS-SD)."""
