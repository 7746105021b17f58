"""swarmtrain protocol package."""
