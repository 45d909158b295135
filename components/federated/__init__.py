"""Federated learning without a framework: client updates, example-weighted aggregation (FedAvg / FedProx), the
round loop. The Flower adapter (optional extra) calls the same functions."""
