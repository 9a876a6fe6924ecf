-- Instance logs are bounded by bytes: node agents cut lines at 16 KiB, and Store::append_logs keeps at most
-- 1 MiB (and 2000 lines) per instance. Rows stored before, by agents that did not cut, are brought within those
-- bounds once, so that no read returns more. A line is cut at 16384 characters when those fit in 16 KiB (ASCII),
-- else at 4096 (which always do), and marked as the agents mark theirs.
UPDATE instance_logs
SET line = cut.text || '… [line cut: ' || (octet_length(line) - octet_length(cut.text)) || ' more bytes]'
FROM (
    SELECT instance_id, seq,
           CASE WHEN octet_length(left(line, 16384)) <= 16384 THEN left(line, 16384) ELSE left(line, 4096) END AS text
    FROM instance_logs WHERE octet_length(line) > 16384
) cut
WHERE instance_logs.instance_id = cut.instance_id AND instance_logs.seq = cut.seq;

DELETE FROM instance_logs l
USING (
    SELECT instance_id, seq FROM (
        SELECT instance_id, seq, sum(octet_length(line)) OVER newest AS bytes, row_number() OVER newest AS lines
        FROM instance_logs
        WINDOW newest AS (PARTITION BY instance_id ORDER BY seq DESC ROWS UNBOUNDED PRECEDING)
    ) ranked WHERE bytes > 1048576 OR lines > 2000
) old
WHERE l.instance_id = old.instance_id AND l.seq = old.seq;
