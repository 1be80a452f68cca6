"""One router per resource (prefix + tags), all thin over :class:`CompanyService`."""
