"""The ServerApp and the ClientApp of the federated run (SPEC "Federated learning"; docs/FEDERATED.md, "Flower's
deployment runtime"): the server runs ``run_federated`` with the run config's configuration and the SuperNodes as
its clients; a client computes client k's update. Both are built by ``utils.fed.flower``."""
from utils.fed.flower import build_client_app, build_server_app
from utils.fed.run import run_federated

server_app = build_server_app(run_federated)
client_app = build_client_app()
