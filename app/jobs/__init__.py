"""Fine-tune jobs: the runner that executes them and the store (SQLite or PostgreSQL) that records them."""
