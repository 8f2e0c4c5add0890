"""Serving: the HTTP server (`python -m zimage_deploy.serve`) and the Ray Serve deployment (`ray_app`)."""
