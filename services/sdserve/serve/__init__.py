"""The Ray Serve shell: thin deployments around the stage services, the gRPC ingress, the job
worker, the application graph (app.py) and starting/stopping it (server.py).

This is the only package that imports Ray; every private Ray API it uses sits in `_ray.py`.
"""
