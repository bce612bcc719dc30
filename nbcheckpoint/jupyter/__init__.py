"""Code that runs in the kernel's manager: the provisioner, the shim, the server extension."""
