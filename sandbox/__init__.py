"""Local emulators of the providers' APIs and a real local S3 server (SeaweedFS), for new
users and for every test: they check signatures, enforce the published limits, keep job state
and charge credits as the real services do. Nothing here is imported by the product code."""
