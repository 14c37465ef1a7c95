"""Helpers shared by test modules (images, settings, servers, fixtures), so no test module imports another."""
