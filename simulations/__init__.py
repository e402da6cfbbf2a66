"""Local multi-node simulation over Flower's simulation engine, and the run configs."""
