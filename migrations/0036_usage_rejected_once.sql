-- A rejected NATS message is kept once however often JetStream delivers it (an acknowledgement
-- lost or late after the rejection was written): keyed by its stream and stream sequence.
-- Rows without them (none are written today) are not constrained: NULLs are distinct.
alter table usage_rejected add column stream text, add column stream_seq bigint;
create unique index usage_rejected_stream_seq_key on usage_rejected (stream, stream_seq);
