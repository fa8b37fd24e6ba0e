-- One write to handoff's shared map, applied atomically by Redis (src/state/redis.rs).
--
-- KEYS[1] the data key (PREFIX .. "k:" .. name), KEYS[2] the meta hash (fields `bytes`: the
-- map's total size, `seq`: the last change's number), KEYS[3] the hash of each key's size,
-- KEYS[4] the sorted set of deadlines (ms since the epoch) of keys with a TTL.
-- ARGV: op, channel, max_total, name, then per op:
--   set  value ttl_ms|''          del  -
--   incr by ttl_ms|''             cas  has_expected expected has_new new ttl_ms|''
-- Answers {'ok', seq, result[, ttl_ms]} (seq 0: nothing changed; incr adds the counter's
-- TTL, -1: none), {'full'} or {'nan'}. Every change
-- is published on the channel as "SEQ KIND TTL_MS KEYLEN KEYVALUE" (KIND s: set, d: deleted;
-- TTL_MS -1: none), so every replica applies it in the order Redis did.
local key, meta, sizes, expiry = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, channel, max_total, name = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Drop the size of a key from the total (Redis expires keys without telling anyone, so
-- the sizes of expired keys are dropped here, by the next write).
local function forget(k)
  local size = redis.call('HGET', sizes, k)
  if size then
    redis.call('HINCRBY', meta, 'bytes', -tonumber(size))
    redis.call('HDEL', sizes, k)
  end
  redis.call('ZREM', expiry, k)
end

local function account(k, size, ttl)
  redis.call('HSET', sizes, k, size)
  redis.call('HINCRBY', meta, 'bytes', size)
  if ttl then
    redis.call('ZADD', expiry, now + ttl, k)
  end
end

for _, k in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 100)) do
  if redis.call('EXISTS', k) == 0 then
    forget(k)
  end
end
if redis.call('EXISTS', key) == 0 then
  forget(key)
end

-- Whether the map stays within max_total with `size` bytes under this key.
local function fits(size)
  local total = tonumber(redis.call('HGET', meta, 'bytes') or '0')
  local old = tonumber(redis.call('HGET', sizes, key) or '0')
  return total - old + size <= max_total
end

local function publish(kind, value, ttl)
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('PUBLISH', channel,
    seq .. ' ' .. kind .. ' ' .. (ttl or -1) .. ' ' .. #name .. ' ' .. name .. (value or ''))
  return seq
end

local function store(value, ttl)
  local size = #name + #value
  if not fits(size) then
    return {'full'}
  end
  if ttl then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
  forget(key)
  account(key, size, ttl)
  return {'ok', publish('s', value, ttl), 1}
end

local function remove()
  local existed = redis.call('DEL', key)
  forget(key)
  return {'ok', publish('d', nil, nil), existed}
end

if op == 'set' then
  return store(ARGV[5], tonumber(ARGV[6]))
elseif op == 'del' then
  return remove()
elseif op == 'incr' then
  local old = redis.call('GET', key)
  local r = redis.pcall('INCRBY', key, ARGV[5])
  if type(r) == 'table' and r.err then
    return {'nan'}
  end
  local new = redis.call('GET', key)
  local size = #name + #new
  if not fits(size) then
    if old then
      redis.call('SET', key, old, 'KEEPTTL')
    else
      redis.call('DEL', key)
    end
    return {'full'}
  end
  if not old and ARGV[6] ~= '' then
    redis.call('PEXPIRE', key, ARGV[6])
  end
  local pttl = redis.call('PTTL', key)
  local ttl = nil
  if pttl > 0 then
    ttl = pttl
  end
  forget(key)
  account(key, size, ttl)
  return {'ok', publish('s', new, ttl), new, ttl or -1}
elseif op == 'cas' then
  local current = redis.call('GET', key)
  local matches
  if ARGV[5] == '1' then
    matches = current == ARGV[6]
  else
    matches = current == false
  end
  if not matches then
    return {'ok', 0, 0}
  end
  if ARGV[7] == '1' then
    return store(ARGV[8], tonumber(ARGV[9]))
  end
  return remove()
end
return redis.error_reply('handoff: unknown operation ' .. tostring(op))
