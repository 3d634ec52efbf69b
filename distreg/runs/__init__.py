"""What makes a job one run: its identity and lineage (`identity.py`), the lock that
keeps a second job out of its run_dir (`lock.py`), and the checks made before Ray
starts (`preflight.py`)."""
