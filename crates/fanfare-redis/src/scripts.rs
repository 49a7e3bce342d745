//! Lua scripts: each runs atomically on the Redis that owns the channel's keys
//! (all keys of a channel share a hash tag, so this holds in Redis Cluster too).

/// Publish, with history when the size is not 0 and idempotency when the
/// window is not 0. KEYS: stream, meta, idempotency key. ARGV: body, history
/// size, stream ttl (s), epoch candidate, meta ttl (s), pub/sub channel, publish
/// command, idempotency window (s). Returns {offset, epoch, duplicate (0/1)}.
pub const PUBLISH: &str = r#"
if ARGV[8] ~= '0' then
  local prev = redis.call('get', KEYS[3])
  if prev then
    local sep = string.find(prev, ':', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), string.sub(prev, sep + 1), 1}
  end
end
local offset = 0
local epoch = ''
if ARGV[2] ~= '0' then
  offset = redis.call('hincrby', KEYS[2], 's', 1)
  if redis.call('hsetnx', KEYS[2], 'e', ARGV[4]) == 1 then
    -- A new epoch: whatever an older stream held is no longer addressable.
    redis.call('del', KEYS[1])
  end
  epoch = redis.call('hget', KEYS[2], 'e')
  redis.call('expire', KEYS[2], ARGV[5])
  redis.call('xadd', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
  redis.call('expire', KEYS[1], ARGV[3])
end
redis.call(ARGV[7], ARGV[6], 'p' .. offset .. ':' .. ARGV[1])
if ARGV[8] ~= '0' then
  redis.call('set', KEYS[3], offset .. ':' .. epoch, 'EX', ARGV[8])
end
return {offset, epoch, 0}
"#;

/// Read history. KEYS: stream, meta. ARGV: epoch candidate, meta ttl (s),
/// exclusive start offset ('' = from the beginning), limit (-1 = all, 0 = none),
/// reverse ('1'). Returns {top offset, epoch, entries}.
pub const HISTORY: &str = r#"
local top = redis.call('hget', KEYS[2], 's')
if redis.call('hsetnx', KEYS[2], 'e', ARGV[1]) == 1 then
  redis.call('expire', KEYS[2], ARGV[2])
end
local epoch = redis.call('hget', KEYS[2], 'e')
local entries = {}
if ARGV[4] ~= '0' then
  local args
  if ARGV[5] == '1' then
    args = {'xrevrange', KEYS[1], '+', '-'}
  else
    local from = '-'
    if ARGV[3] ~= '' then from = '(' .. ARGV[3] .. '-0' end
    args = {'xrange', KEYS[1], from, '+'}
  end
  if ARGV[4] ~= '-1' then
    table.insert(args, 'COUNT')
    table.insert(args, ARGV[4])
  end
  entries = redis.call(unpack(args))
end
return {tonumber(top) or 0, epoch, entries}
"#;

/// Presence add. KEYS: hash, zset. ARGV: client, info, expire-at (unix s), ttl (s).
pub const PRESENCE_ADD: &str = r#"
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], ARGV[3], ARGV[1])
redis.call('expire', KEYS[1], ARGV[4])
redis.call('expire', KEYS[2], ARGV[4])
return 1
"#;

/// Presence read, dropping expired entries. KEYS: hash, zset. ARGV: now (unix s).
/// Returns the hash as a flat list.
pub const PRESENCE_GET: &str = r#"
local expired = redis.call('zrangebyscore', KEYS[2], '-inf', ARGV[1])
if #expired > 0 then
  for i = 1, #expired, 1000 do
    redis.call('hdel', KEYS[1], unpack(expired, i, math.min(i + 999, #expired)))
  end
  redis.call('zremrangebyscore', KEYS[2], '-inf', ARGV[1])
end
return redis.call('hgetall', KEYS[1])
"#;
