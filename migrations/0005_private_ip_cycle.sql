-- Private IPs are handed out in a cycle through the tenant's network, starting after the last one given, so a
-- released address is reused as late as possible (an edge or DNS cache still holding the old route to it
-- then reaches nothing rather than another instance).
ALTER TABLE tenants ADD COLUMN last_private_ip inet;
