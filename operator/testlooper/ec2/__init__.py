"""EC2 workers: the adapter to the EC2 API (fleet.py) and the bootstrap scripts (user_data.py)."""
