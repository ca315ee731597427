from tunelab.deploy.merge import merge_adapter

__all__ = ["merge_adapter"]
