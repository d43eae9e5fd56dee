"""smtp-gate: block outbound SMTP from guests at the hypervisor's Linux bridge with nftables.

This module stays import-free: the libvirt hooks import the package on every guest
start and stop, and every import here would be paid on that path.
"""

__version__ = "0.1.0"
