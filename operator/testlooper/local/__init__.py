"""The local shell: runs a plan's tasks as processes on this machine (`testlooper run`)."""
