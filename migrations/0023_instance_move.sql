-- Moving an instance to another node (issue 20, `cloudctl instance move NAME --node NODE`). A running instance is
-- handed over rather than reassigned at once: its node stops it first (it sees the instance as wanted stopped
-- while move_to is set) and, when it reports the stop, the instance passes to move_to as pending. So the two
-- nodes never run it (and its private IP) at the same time. A node lost or leaving mid-move hands it over too.
ALTER TABLE instances ADD COLUMN move_to uuid REFERENCES nodes (id) ON DELETE SET NULL;
