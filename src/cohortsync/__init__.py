"""
cohortsync: keep user cohorts in sync with third-party destinations.
"""
