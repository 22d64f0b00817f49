-- Replies kept for `Idempotency-Key`s expire after 24 hours: the sweeper removes them in
-- batches by age. A new API key in a kept reply is now sealed (`secret_sealed`); replies
-- kept before held it in clear, so it is taken out of them (a replay of one answers without
-- the key, which its first answer showed).
create index idempotency_keys_created_idx on idempotency_keys (created_at);
update idempotency_keys set response = response - 'secret' where response ? 'secret';
