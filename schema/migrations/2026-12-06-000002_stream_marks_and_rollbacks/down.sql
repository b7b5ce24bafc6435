DROP TABLE stream_rollbacks;
DROP TABLE stream_marks;
