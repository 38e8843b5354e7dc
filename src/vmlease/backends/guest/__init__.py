"""What both QEMU-based backends put inside a VM and say to it.

The guest layer: the images VMs boot (``images``) and the host side of the
guest agent's protocol (``_agent``). The QEMU and libvirt backends stand on
it and on nothing of each other's.
"""
