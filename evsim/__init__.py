"""evsim: EV charging network lab."""
