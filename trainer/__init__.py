"""swarmtrain trainer package."""
