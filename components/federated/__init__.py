"""Federated learning without a framework: client updates, example-weighted aggregation (FedAvg / FedProx), the
round loop. The Flower adapter (optional extra) calls the same functions.

Modules: ``shards`` (read the data stage's client shards, cut a split per client), ``payload`` (what is sent:
selected parameters as fp32 CPU tensors), ``aggregate`` (FedAvg, update screening, the FedProx term, pure),
``client`` (one local update), ``rounds`` (the server loop: missing / rejected clients, reports),
``simulate`` (all clients in one process).
"""
