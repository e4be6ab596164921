"""What one computer does alone: model, data, seed schedule, inner loop, rounds, checkpoints."""
