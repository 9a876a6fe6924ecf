-- Hosts join the platform (issue 19). A node agent that runs the overlay announces its underlay address (where
-- its peers' tunnels end) and the public part of a key pair it makes at every start; the store gives it an overlay
-- address from the platform's host pool (`platform.host_pool`) once, kept across its re-registrations. All three
-- are null for a node that runs no overlay (one host, loopback mode, tests), as for every node registered before.
ALTER TABLE nodes
    ADD COLUMN underlay_address inet
        CONSTRAINT nodes_underlay_address_host CHECK (family(underlay_address) = 4 AND masklen(underlay_address) = 32),
    ADD COLUMN overlay_address inet
        CONSTRAINT nodes_overlay_address_host CHECK (family(overlay_address) = 4 AND masklen(overlay_address) = 32),
    ADD COLUMN overlay_public_key bytea
        CONSTRAINT nodes_overlay_public_key_length CHECK (octet_length(overlay_public_key) = 32),
    -- One host per underlay address: a dead node's address is taken over by clearing it on that node in the same
    -- transaction (the store refuses the takeover while the holder is live).
    ADD CONSTRAINT nodes_underlay_address_key UNIQUE (underlay_address),
    ADD CONSTRAINT nodes_overlay_address_key UNIQUE (overlay_address),
    -- A key is only worth something with the addresses its tunnels use.
    ADD CONSTRAINT nodes_overlay_key_needs_addresses
        CHECK (overlay_public_key IS NULL OR (underlay_address IS NOT NULL AND overlay_address IS NOT NULL));
