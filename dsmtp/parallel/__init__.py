"""Process groups and every collective dsmtp uses. Model code never talks to other ranks directly."""
