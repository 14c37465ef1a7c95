"""clipshot on Ray Serve: a CPU router in front of detector replicas that each run the whole service.

``asgi_call`` (no Ray needed) carries one HTTP exchange between processes; ``deployments`` holds the two
Ray Serve deployments; ``launch`` checks the configuration and starts the application.
"""
